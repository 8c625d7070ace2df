from .layers import paper_hooks, paper_layer, paper_layers  # noqa: F401 (the lead's __init__ supersedes this)
