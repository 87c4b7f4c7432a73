"""Training-framework callbacks around :class:`~curvature.tracking.SharpnessTracker` (optional extras).

* :mod:`curvature.integrations.lightning` — ``SharpnessCallback`` for Lightning (``lightning.pytorch``, or the
  standalone ``pytorch_lightning`` package); extra ``torch-curvature[lightning]``.
* :mod:`curvature.integrations.transformers` — ``SharpnessCallback`` for the Hugging Face ``Trainer``; extra
  ``torch-curvature[transformers]`` (``transformers`` and ``accelerate``).

Nothing is imported here: importing :mod:`curvature` or this package never imports Lightning or transformers;
import the submodule you need.
"""
__all__: list[str] = []
