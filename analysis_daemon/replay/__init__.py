"""`analysis-daemon replay`: reads saved checkpoints (safetensors, torch weights-only, .npy) and
feeds them through the same pipeline and sinks as the live daemon."""
