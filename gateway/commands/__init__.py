"""Command groups of the ``gateway`` CLI, one module each, each with ``register(subparsers)``.

A module registers its sub-parser and sets ``handler`` (``Callable[[argparse.Namespace], int]``)
with ``parser.set_defaults(handler=...)``; the handler returns the exit status.
"""
