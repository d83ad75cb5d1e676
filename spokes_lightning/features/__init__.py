"""Turning a corpus into N x d feature matrices: gradients, embeddings, quality scores."""
