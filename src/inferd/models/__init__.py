"""Models: the repository on disk, the runtimes, and the registry of live versions."""

from inferd.models.base import Model
from inferd.models.registry import LoadedModel, ModelRegistry
from inferd.models.repository import ModelRepository
from inferd.models.spec import ModelSpec

__all__ = ["LoadedModel", "Model", "ModelRegistry", "ModelRepository", "ModelSpec"]
