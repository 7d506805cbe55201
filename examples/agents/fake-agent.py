#!/usr/bin/env python3
"""A small program that behaves like an agent CLI, for tests and demos.

It reads the task prompt ($DEVFLEET_PROMPT_FILE), looks at its working
directory (the task workspace), writes the task's file there, appends a line
to CHANGELOG.md (a second file it edits), and reports its usage in
$DEVFLEET_USAGE_FILE. Lines of the task's spec starting with `agent:` steer
it, so tests can make it misbehave on purpose:

  agent: fail-attempts 1,2   exit 3 (retryable) on these attempts
  agent: fatal               exit 65 (the task is unworkable: not retryable)
  agent: sleep SECONDS       sleep before writing (to hit a timeout)
  agent: spawn TOKEN         leave a background process (argv holds TOKEN)
                             that would run for 10 minutes
  agent: env NAME            record NAME's value (or "(unset)") in the file
  agent: write-outside PATH  try to create PATH; record "ok" or "denied"

Run it as: python3 fake-agent.py (no arguments).
"""
import json
import os
import subprocess
import sys
import time


def main():
    path = os.environ["DEVFLEET_TASK_PATH"]
    spec = os.environ.get("DEVFLEET_TASK_SPEC", "")
    attempt = int(os.environ.get("DEVFLEET_TASK_ATTEMPT", "1"))
    with open(os.environ["DEVFLEET_PROMPT_FILE"], encoding="utf-8") as f:
        prompt = f.read()
    directives = [
        line.strip()[len("agent:"):].strip()
        for line in spec.splitlines()
        if line.strip().startswith("agent:")
    ]
    notes = []
    for d in directives:
        verb, _, arg = d.partition(" ")
        arg = arg.strip()
        if verb == "fail-attempts" and str(attempt) in arg.split(","):
            print(f"fake-agent: failing attempt {attempt} on purpose", file=sys.stderr)
            sys.exit(3)
        elif verb == "fatal":
            print("fake-agent: this task is unworkable", file=sys.stderr)
            sys.exit(65)
        elif verb == "sleep":
            time.sleep(float(arg))
        elif verb == "spawn":
            subprocess.Popen(
                [sys.executable, "-c", "import time; time.sleep(600)", arg],
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            notes.append(f"spawned {arg}")
        elif verb == "env":
            notes.append(f"env {arg}={os.environ.get(arg, '(unset)')}")
        elif verb == "write-outside":
            try:
                with open(arg, "w", encoding="utf-8") as f:
                    f.write("escaped\n")
                notes.append(f"outside {arg}: ok")
            except OSError:
                notes.append(f"outside {arg}: denied")

    seen = sorted(
        os.path.relpath(os.path.join(root, name), ".")
        for root, dirs, files in os.walk(".")
        for name in files
    )
    first_line = prompt.splitlines()[0] if prompt else ""
    text = [f"# written by fake-agent, attempt {attempt}", f"# prompt: {first_line}"]
    text += [f"# saw: {p}" for p in seen]
    text += [f"# {n}" for n in notes]
    text.append(f"SPEC = {json.dumps(spec)}")
    out = "\n".join(text) + "\n"

    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(out)
    with open("CHANGELOG.md", "a", encoding="utf-8") as f:
        f.write(f"- fake-agent wrote {path}\n")
    usage_file = os.environ.get("DEVFLEET_USAGE_FILE")
    if usage_file:
        with open(usage_file, "w", encoding="utf-8") as f:
            json.dump(
                {"model": "fake-1", "tokens_in": len(prompt), "tokens_out": len(out)}, f
            )
    print(f"fake-agent: wrote {path}")


if __name__ == "__main__":
    main()
