"""The commands of the ``visalign`` command line (:mod:`visalign.cli` parses the arguments and dispatches)."""
