"""Sparse upcycling (arXiv 2212.05055): dense MLPs become a mixture of experts that keeps training.

moe.py      the MoE block (top-k or expert-choice routing, capacity, routing statistics)
convert.py  surgery on a loaded model: chosen layers' MLPs -> E copies + a router
losses.py   auxiliary losses (load balancing, router z-loss) and routing metrics for the train loop
io.py       save/load: Mixtral or Qwen2-MoE folders for top-k Llama models, deltatune's format otherwise
"""
