"""RLEdit2 (RLEdit with multiple BP steps) and its one-step baseline RLEdit1."""
