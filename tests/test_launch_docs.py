"""The documentation a newcomer reads: the API page covers every module, and the links and
commands in README.md / launch/README.md point at things that exist."""

import os
import re
import runpy
import subprocess

from tests.test_engine import REPO

make_api = runpy.run_path(os.path.join(REPO, "docs", "make_api.py"), run_name="make_api")


def test_api_page_covers_every_module():
    text = make_api["render"]()
    documented = set(re.findall(r"^### `(jaxml[\w.]*)`", text, flags=re.M))
    missing = [m for m in make_api["modules"]() if m not in documented and m not in ("jaxml.models", "jaxml.train")]
    assert not missing, f"modules without an API section: {missing}"
    # A function's line carries its signature and the first line of its docstring.
    assert "- `def train(experiment: module, config:" in text and "Restore-or-init" in text
    assert os.path.exists(os.path.join(REPO, "docs", "api.md"))


def test_readme_links_and_launch_files_exist():
    for doc in ("README.md", "launch/README.md"):
        text = open(os.path.join(REPO, doc)).read()
        base = os.path.dirname(os.path.join(REPO, doc))
        for target in re.findall(r"\]\(([^)#:]+)\)", text):
            assert os.path.exists(os.path.join(base, target)), f"{doc} links to missing {target}"
        for path in re.findall(r"`(launch/[\w./{},-]+)`", text):
            for p in re.sub(r"\{([^}]*)\}", lambda m: m[1].split(",")[0], path).split():
                assert os.path.exists(os.path.join(REPO, p.rstrip("."))), f"{doc} names missing {p}"


def test_launch_readme_tpu_vm_example_matches_the_script():
    # The README shows what --dry-run prints; it must be what the script prints today.
    readme = open(os.path.join(REPO, "launch", "README.md")).read()
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "create", "--project=my-proj",
                          "--zone=us-west4-a", "--name=jx", "--accelerator-type=v5litepod-8",
                          "--runtime-version=v2-alpha-tpuv5-lite", "--dry-run"], capture_output=True, text=True)
    assert out.stdout.strip() in readme
    out = subprocess.run(["bash", os.path.join(REPO, "launch", "tpu_vm.sh"), "run", "--project=my-proj",
                          "--zone=us-west4-a", "--name=jx", "--accelerator-type=v5litepod-8", "--dry-run", "--",
                          "experiments.gpt", "--workdir=runs/gpt"], capture_output=True, text=True)
    assert out.stdout.strip() in readme
