"""MALMEN2 (MALMEN with multiple BP steps) and its one-step baseline MALMEN1."""
