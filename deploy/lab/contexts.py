"""A lab's bus context: written by `lab up`, removed by `lab down`.

`ferry` finds its bus through a context (services/cli/context.py), and knows nothing of labs.
So `lab up` writes the lab's context where `ferry` looks:

- `<lab dir>/context.json` (/var/lib/ferry-lab/<lab>/context.json), for
  `ferry --context FILE` or `FERRY_CONTEXT=FILE`; it goes with the lab's directory;
- the context named after the lab, `$XDG_CONFIG_HOME/ferry/contexts/<lab>.json`: what
  `FERRY_LAB=<lab> ferry …` selects (FERRY_LAB is `ferry`'s deprecated alias of
  FERRY_CONTEXT=<lab>), so every existing script and test, and labs side by side, keep
  working unchanged;
- the default context, `$XDG_CONFIG_HOME/ferry/context.json`, so a bare `ferry …` talks to
  the lab, as the `nats` CLI selects a context. Only when the user did not choose one
  (FERRY_CONTEXT or --context unset), and only when there is no default yet, or the
  default is a lab's and this is the unnamed lab (`ferry`, FERRY_LAB unset: the one a bare
  `ferry` always meant) or the default's lab is gone. A default the user wrote is never
  replaced, and a test's lab (FERRY_LAB=t…) never takes the default from a working lab.

A context written here says so in its description (`ferry lab <name>`); `lab down` removes
the lab's named context and the default too if it is this lab's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from deploy.lab.layout import DEFAULT_LAB, LabLayout, LabSpec
from services.cli.context import BusContext, context_file, default_context_file, write_context

Say = Callable[[str], None]
MARK = "ferry lab "


def lab_context(spec: LabSpec) -> BusContext:
    """The lab's operator: every node of its cluster, and the operator's credentials."""
    layout = LabLayout(spec.lab)
    creds = layout.operator_dir / "operator.creds"
    return BusContext(
        servers=spec.nats_urls, creds=creds, ca=layout.ca_file, description=f"{MARK}{spec.lab}"
    )


def written_for(path: Path) -> str | None:
    """The lab a context file was written for by `lab up`; None if missing, bad or not a lab's."""
    try:
        context = BusContext.model_validate_json(path.read_bytes())
    except (OSError, ValidationError):
        return None
    if not context.description.startswith(MARK):
        return None
    return context.description.removeprefix(MARK)


def _may_take_default(default: Path, lab: str) -> bool:
    if not default.exists():
        return True
    owner = written_for(default)
    if owner is None:  # the user's own (or unreadable): never ours to replace
        return False
    return owner == lab or lab == DEFAULT_LAB or not LabLayout(owner).lab_file.exists()


def write(layout: LabLayout, spec: LabSpec, say: Say, *, select_default: bool) -> None:
    context = lab_context(spec)
    write_context(layout.context_file, context)
    write_context(context_file(layout.lab), context)
    default = default_context_file()
    if select_default and _may_take_default(default, layout.lab):
        if written_for(default) != layout.lab:
            say(f"lab {layout.lab}: now the default context ({default})")
        write_context(default, context)


def remove(layout: LabLayout, say: Say) -> None:
    layout.context_file.unlink(missing_ok=True)
    context_file(layout.lab).unlink(missing_ok=True)
    default = default_context_file()
    if written_for(default) == layout.lab:
        default.unlink(missing_ok=True)
        say(f"lab {layout.lab}: default context {default} removed")
