"""Base class for every fleetrl config model: unknown keys are errors; and the environment-variable
value type."""

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict


class StrictModel(BaseModel):
    """A pydantic model that rejects unknown keys, validates on assignment and refuses inf and NaN floats."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def env_text(value: Any) -> Any:
    """An environment variable's value as the text a shell would hold: YAML reads `1` as an int and
    `true` as a bool, so numbers become their text (1 -> "1", 0.5 -> "0.5") and bools "1"/"0".
    Anything else but a string (a list, a mapping, null) is left for pydantic to reject."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (int, float)):
        return str(value)
    return value


# A value of an environment-variable mapping (e.g. rollout.env_vars): a string; numbers and bools
# from YAML or overrides are turned into strings by env_text.
EnvStr = Annotated[str, BeforeValidator(env_text)]
