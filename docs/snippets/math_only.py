# The analysis functions on their own: pure functions on CPU tensors, no daemon.
import torch

from analysis_daemon import analyze_embedding_geometry, measure_semantic_drift

prev = torch.randn(1000, 64)
curr = prev @ torch.linalg.qr(torch.randn(64, 64)).Q + 0.01 * torch.randn(1000, 64)  # rotated, nudged
drift = measure_semantic_drift(prev, curr, top_k=5)         # Procrustes-aligned cosine and distance
geometry = analyze_embedding_geometry(curr, threshold=0.7)  # all-pairs cosine statistics, chunked
print(f"drift cosine {drift['average_cosine_similarity']:.4f} (a rotation is not drift: near 1)")
print(f"mean pairwise cosine {geometry['global_sparsity']['mean_similarity']:.4f}")
