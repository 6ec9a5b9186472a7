"""A job worker: jobs arrive pickled on a spool directory and run as shell commands."""

import os
import pickle
import subprocess
import sys

SPOOL = "/var/spool/jobs"


class Worker:
    def __init__(self, spool: str = SPOOL) -> None:
        self.spool = spool

    def load(self, name: str) -> dict:
        with open(os.path.join(self.spool, name), "rb") as f:
            return pickle.load(f)

    def run(self, job: dict) -> int:
        done = subprocess.run(job["argv"], check=False)
        os.remove(os.path.join(self.spool, job["name"]))
        return done.returncode


def main() -> None:
    worker = Worker()
    for name in sorted(os.listdir(SPOOL)):
        worker.run(worker.load(name))
    os.system("sync")


if __name__ == "__main__":
    main()
    sys.exit(0)
