"""Applications of a trained model: synthetic instruction data (Self-Instruct) and its curation by a judge
(AlpaGasus)."""
