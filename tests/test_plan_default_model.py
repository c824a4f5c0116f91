"""The plan for the real default model against what its training step actually keeps (slow)."""

import pytest
import torch

from deltatune.analysis.memory import parameter_report, plan_finetune
from deltatune.methods.apply import apply_methods
from deltatune.methods.base import MethodSpec


@pytest.mark.slow
def test_default_model_plan_matches_the_loaded_model_and_measured_activations():
    from deltatune.models import load_model

    spec = [MethodSpec(name="lora", rank=8, alpha=16)]
    model, _ = load_model(None, dtype=torch.float32)
    adapted = apply_methods(model, spec)
    plan = plan_finetune(None, spec, dtype="fp32", batch_size=2, seq_len=128)
    assert plan.params.to_dict() == parameter_report(adapted).to_dict()  # meta plan == loaded model, exactly
    model.train()
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(3, model.config.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in storages.items() if ptr not in weights)
    print(
        f"activations: estimate {plan.activation_bytes / 2**20:.1f} MiB, saved for backward {measured / 2**20:.1f} MiB"
    )
    assert 0.7 * measured <= plan.activation_bytes <= 1.3 * measured
