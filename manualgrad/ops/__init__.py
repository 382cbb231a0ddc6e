"""Hand-written forward/backward pairs and the autograd Functions built on them, one file per
op family. See linear.py for the pattern: ``<op>_forward`` / ``<op>_backward`` on plain
tensors with the math and shapes in comments, then a thin ``<Op>Function``."""
