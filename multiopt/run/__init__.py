"""Many configs: presets, launchers (in-process, isolated workers, torchrun ranks), sweeps, fit."""
