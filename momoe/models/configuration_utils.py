"""Typed model configurations serialised to config.json; unknown keys are an error."""
import dataclasses
from typing import Any, ClassVar, Dict, Mapping, Type, TypeVar

C = TypeVar("C", bound="ModelConfig")


@dataclasses.dataclass
class ModelConfig:
    """Base of every family's config. `model_type` names the family in config.json."""

    model_type: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError on inconsistent fields (families extend this)."""

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["model_type"] = self.model_type
        return out

    @classmethod
    def from_dict(cls: Type[C], data: Mapping[str, Any]) -> C:
        data = dict(data)
        model_type = data.pop("model_type", cls.model_type)
        if model_type != cls.model_type:
            raise ValueError(f"momoe: config is for model_type {model_type!r}, not {cls.model_type!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ValueError(f"momoe: unknown {cls.__name__} keys {unknown}; known keys: {sorted(fields)}")
        return cls(**data)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
