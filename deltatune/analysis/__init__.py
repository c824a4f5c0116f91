"""Analysis of what training changed: weight decomposition, spectra, memory (see each module)."""
