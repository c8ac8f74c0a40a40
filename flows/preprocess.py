"""Flow: check the config, then preprocess data.videos into data.shards (cached on the data and model)."""

from __future__ import annotations

import sys

from prefect import flow

from flows.tasks import check_config, preprocess


@flow(name="preprocess")
def preprocess_flow(config: str, overrides: list[str] | None = None) -> str:
    overrides = overrides or []
    check_config(config, overrides)
    return preprocess(config, overrides)


if __name__ == "__main__":
    preprocess_flow(sys.argv[1], sys.argv[2:])
