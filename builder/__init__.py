"""The builder: demo model export, repository versions for each backend, the repository listing and
the sidecar that publishes new versions to running workers.

Commands (registered by `builder.cli`): ``jetinfer export-demo``, ``jetinfer build``,
``jetinfer models`` and ``jetinfer sidecar``. torch is imported lazily, only where a model is exported.
"""

from __future__ import annotations

__all__: list[str] = []
