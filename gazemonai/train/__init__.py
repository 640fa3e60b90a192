"""Multi-level training, as pieces that the bundles' configs wire into MONAI's engines.

``transforms`` (mask transforms) -> ``datalists`` (which files a run reads, seeded splits) ->
``networks`` (``MultiLevelNet``) -> ``losses`` (``MultiLevelGazeLoss``) -> ``engine`` (batch
preparation, inferer, supervision switch) -> ``handlers`` (metrics, reports, checkpoints).
``low_memory`` holds the opt-in tricks that train in less CPU memory (levelwise step, optimizer
step inside backward, returning freed heap to the OS), each with what it saves and what it refuses.

Builds on :mod:`gazemonai.gaze` (pseudo-masks on the fly) and :mod:`gazemonai.prep`; never imports
:mod:`gazemonai.serve`.
"""
