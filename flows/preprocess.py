"""Flow: check the config, then preprocess data.videos into data.shards (cached on the data and model)."""

from __future__ import annotations

import sys

from prefect import flow

from flows.credentials import load_storage_credentials
from flows.tasks import cached, check_config, preprocess, shards_missing


@flow(name="preprocess")
def preprocess_flow(config: str, overrides: list[str] | None = None) -> str:
    overrides = overrides or []
    load_storage_credentials()
    check_config(config, overrides)
    return cached(preprocess, shards_missing(config, overrides))(config, overrides)


if __name__ == "__main__":
    preprocess_flow(sys.argv[1], sys.argv[2:])
