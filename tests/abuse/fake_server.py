"""The real app, served by uvicorn in its own process, on the fake engine: what the
fault-injection tests kill with SIGKILL (the real engine needs vLLM and minutes).

Usage: python -m tests.abuse.fake_server <settings.json> <port>
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import uvicorn

from server.app import create_app
from server.settings import Settings
from tests.fakes import FakeEngine


def main(settings_path: str, port: int) -> None:
    settings = Settings(**json.loads(Path(settings_path).read_text()))
    app = create_app(settings, engine=FakeEngine())
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
