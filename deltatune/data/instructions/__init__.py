"""Making instruction data: labelled files through phrasings (FLAN/P3), Self-Instruct bootstrapping,
duplicate and length filtering (LIMA), and seeded mixtures. Every writer is atomic (see `output`)."""
