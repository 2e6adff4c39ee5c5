"""Studies: grids of runs that train and evaluate (``leuko cv``, ``leuko compare``) and learning curves
(``leuko curve``). They sit above training, derivation and evaluation, which they combine."""
