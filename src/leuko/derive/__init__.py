"""Runs made from runs, training no network from scratch: route, ensemble, adapt (and fine-tune).

Each takes finished run folders and writes a new one (built beside ``--out`` and renamed into place by
:func:`leuko.run.folder.derived_run`) that every downstream verb takes like a trained run.
"""
