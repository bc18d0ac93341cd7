"""A child's side: which Subject each job kind is, and the loop that serves the parent's commands."""

from __future__ import annotations

import json
import os
import sys

from cake.errors import CakeError

from .bandwidth import Bandwidth, Reads
from .children import Job, Subject, cpu_list, peak_rss
from .generation import Cake, Transformers
from .models import Build

SUBJECTS: dict[str, type[Subject]] = {
    "build": Build,
    "bandwidth": Bandwidth,
    "reads": Reads,
    "transformers": Transformers,
    "cake-local": Cake,
    "cake-local-server": Cake,
    "cake-workers": Cake,
    "cake-workers-no-relay": Cake,
    "cake-workers-no-poll": Cake,
}


def child_main(job_json: str) -> None:
    """Serve one measured thing to the parent: a JSON line per command read from stdin."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever a library prints goes to the log, never into the answers
    job = Job(**json.loads(job_json))

    def answer(d: dict) -> None:
        answers.write(json.dumps(d) + "\n")

    try:
        subject = SUBJECTS[job.kind](job)
        answer({"ready": True})
        for line in sys.stdin:
            command, *arg = line.split()
            if command == "run":
                answer(subject.run())
            elif command == "concurrent":
                answer(subject.concurrent(int(arg[0])))
            elif command == "products":
                answer(subject.products())
            elif command == "finish":
                torch = sys.modules.get("torch")
                answer({**subject.finish(), "peak_rss": peak_rss(),
                        "threads": torch.get_num_threads() if torch else 0, "cpus": cpu_list()})
                return
    except CakeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
