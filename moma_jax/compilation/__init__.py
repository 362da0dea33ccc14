"""Ahead-of-time compiles of the training and inference programs for chips this host need
not have, and the report of what they cost."""
