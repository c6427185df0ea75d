"""One torchrun job, many cases: the loop the tests/dist scripts share."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable
from typing import Any

from autoshard.runtime.launch import rank_session


def run_cases(cases: Iterable[str], check: Callable[[str], dict], **on_failure: Any) -> None:
    """`check(case)` for each case in one rank session (its result file holds every verdict). A case that
    raises is reported failed with its traceback (and `on_failure`'s fields), and the others still run;
    each verdict records its seconds, to choose what CI samples."""
    with rank_session() as session:
        results = {}
        for case in cases:
            start = time.perf_counter()
            try:
                results[case] = check(case)
            except Exception:  # noqa: BLE001 - one case's failure is reported, the others still run
                results[case] = {"ok": False, **on_failure, "problems": [traceback.format_exc()[-3000:]]}
            results[case]["seconds"] = round(time.perf_counter() - start, 1)
        session.result = results
