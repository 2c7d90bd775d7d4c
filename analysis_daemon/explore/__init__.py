"""`analysis-daemon explore RESULTS`: a local web app over the per-token data the daemon and replay keep."""
