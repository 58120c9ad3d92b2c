"""Survival models for prognode: Cox, Lasso-Cox, logistic at a horizon, PCA fusion of feature groups.

Modules:

- :mod:`~pipelines.survival.data`: cohort CSV -> times in days, events, feature frame
- :mod:`~pipelines.survival.design`: preprocessing (encoding, median imputation, standardisation, PCA groups)
- :mod:`~pipelines.survival.fit`: fitting the three model kinds
- :mod:`~pipelines.survival.artifact`: the model folder (``model.json`` + ``MODEL_CARD.md``), schema-checked load
- :mod:`~pipelines.survival.scoring`: ``score(model, features) -> Risk`` with "not evaluable" for missing inputs
- :mod:`~pipelines.survival.metrics`: C-index (Harrell, Uno), td-AUC, calibration, HRs, KM/log-rank, net benefit
- :mod:`~pipelines.survival.report`: self-contained HTML report
- :mod:`~pipelines.survival.cli`: ``prognode model fit|evaluate|report`` and ``prognode cohort split``
- :mod:`~pipelines.survival.pipeline`: the ``survival-risk`` pipeline writing a TID 1500 risk SR

Nothing here imports torch.
"""
