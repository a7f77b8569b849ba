#!/usr/bin/env python3
"""Echo communication test for gridq (port of the mlframework "echo" job).

This script does no real work: it exists to check that gridq passes
parameters, environment variables, output streaming, result files and exit
codes correctly between the queue, the worker and a job.

It accepts *any* command-line parameters, in all the styles gridq can
generate:

    --name=value     (arg_style: equals)
    --name value     (arg_style: space)
    --flag           (a bare flag, i.e. a parameter set to true)
    name=value       (arg_style: hydra)

It then

1. prints one line listing its parameters, e.g.
   ``echo: job 42 params: word=alpha n=1 lines=3 sleep=0.1``;
2. prints ``lines`` numbered lines (``line 1/3 ...``) with ``sleep``
   seconds between them, flushing stdout after every line so that the
   streaming of live output can be observed;
3. writes ``{"params": {...}, "lines": N}`` to the path in ``GRIDQ_RESULT``
   when that variable is set;
4. exits with code 0, unless told otherwise.

Parameters with a special meaning (all optional, all also echoed):

    --lines=N            number of numbered lines to print (default 5)
    --sleep=S            seconds to sleep between lines (default 0.2)
    --fail-on-attempt=K  exit with code 3 (after printing, without writing a
                         result) when GRIDQ_ATTEMPT equals K; used to test
                         retries
    --exit-code=K        exit with code K at the very end

Environment variables read (set by the gridq worker; all optional, so the
script can also be run by hand): GRIDQ_JOB_ID, GRIDQ_SWEEP, GRIDQ_ATTEMPT,
GRIDQ_RESULT.  The GRIDQ_PARAM_<NAME> variables are not needed because the
same values arrive as arguments.

Only the Python 3 standard library is used (Python >= 3.9).
"""

import json
import math
import os
import sys
import time

DEFAULT_LINES = 5
DEFAULT_SLEEP = 0.2

# Exit code used for the simulated failure of --fail-on-attempt.
FAIL_EXIT_CODE = 3
# Exit code for unusable arguments (same convention as argparse).
USAGE_EXIT_CODE = 2


def say(text):
    """Print one line to stdout and flush at once (live output streaming)."""
    print(text, flush=True)


def usage_error(message):
    """Report a bad argument on stderr and exit with code 2."""
    print("echo.py: error: " + message, file=sys.stderr, flush=True)
    sys.exit(USAGE_EXIT_CODE)


def parse_args(argv):
    """Parse arbitrary options generically, without a fixed list of options.

    Returns ``(params, positional)``: ``params`` is an insertion-ordered dict
    mapping parameter names to their raw string values (``True`` for a bare
    flag); ``positional`` lists the tokens that are not parameters.  When a
    name is repeated the last value wins.
    """
    params = {}
    positional = []
    i = 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if token == "--":
            # Conventional end of options: everything after it is positional.
            positional.extend(argv[i:])
            break
        if token.startswith("--") and len(token) > 2:
            body = token[2:]
            if "=" in body:
                # --name=value
                name, value = body.split("=", 1)
                params[name] = value
            elif i < len(argv) and not argv[i].startswith("--"):
                # --name value (the next token is not itself an option)
                params[body] = argv[i]
                i += 1
            else:
                # bare --flag
                params[body] = True
        elif "=" in token and not token.startswith("=") and not token.startswith("-"):
            # name=value (hydra style)
            name, value = token.split("=", 1)
            params[name] = value
        else:
            positional.append(token)
    return params, positional


def to_json_value(value):
    """Convert a raw argument value into the most natural JSON value.

    Bare flags stay ``True``; integer and finite float literals become
    numbers; everything else stays a string.
    """
    if value is True:
        return True
    try:
        return int(value)
    except ValueError:
        pass
    try:
        number = float(value)
    except ValueError:
        return value
    # NaN and infinities are not valid JSON numbers: keep them as text.
    return number if math.isfinite(number) else value


def format_value(value):
    """Render a parameter value for the human-readable parameter line."""
    return "true" if value is True else str(value)


def int_param(params, name, default, minimum):
    """Read an integer parameter, exiting with code 2 when it is invalid."""
    if name not in params:
        return default
    raw = params[name]
    try:
        number = float(raw)  # accepts "3" as well as "3.0"
    except (TypeError, ValueError):
        usage_error("--%s needs an integer value, got %r" % (name, raw))
    if not number.is_integer() or number < minimum:
        usage_error("--%s must be an integer >= %d, got %r" % (name, minimum, raw))
    return int(number)


def float_param(params, name, default, minimum):
    """Read a float parameter, exiting with code 2 when it is invalid."""
    if name not in params:
        return default
    raw = params[name]
    try:
        number = float(raw)
    except (TypeError, ValueError):
        usage_error("--%s needs a number, got %r" % (name, raw))
    if not math.isfinite(number) or number < minimum:
        usage_error("--%s must be a finite number >= %g, got %r" % (name, minimum, raw))
    return number


def same_attempt(wanted, attempt):
    """Tell whether the attempt number ``attempt`` equals ``wanted``.

    Both are compared as integers when possible (so "01" matches "1"), and
    as plain strings otherwise.
    """
    try:
        return int(str(wanted).strip()) == int(attempt.strip())
    except ValueError:
        return str(wanted).strip() == attempt.strip()


def write_result(path, result):
    """Write the result object as JSON to ``path`` (GRIDQ_RESULT)."""
    try:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(result, handle)
            handle.write("\n")
    except OSError as error:
        print("echo.py: cannot write result to %s: %s" % (path, error),
              file=sys.stderr, flush=True)
        sys.exit(1)


def main(argv=None):
    """Run the echo test and return the process exit code."""
    params, positional = parse_args(sys.argv[1:] if argv is None else argv)

    job_id = os.environ.get("GRIDQ_JOB_ID") or "local"
    attempt = os.environ.get("GRIDQ_ATTEMPT") or "1"
    sweep = os.environ.get("GRIDQ_SWEEP") or "-"

    lines = int_param(params, "lines", DEFAULT_LINES, 0)
    sleep = float_param(params, "sleep", DEFAULT_SLEEP, 0.0)
    fail_on_attempt = params.get("fail-on-attempt")
    exit_code = int_param(params, "exit-code", 0, 0)

    # 1. One line with all parameters (including lines/sleep when given).
    rendered = " ".join("%s=%s" % (name, format_value(value))
                        for name, value in params.items())
    header = "echo: job %s params: %s" % (job_id, rendered or "(none)")
    if positional:
        header += " args: " + " ".join(positional)
    say(header)

    # 2. Numbered lines, flushed one by one, with short pauses in between.
    for number in range(1, lines + 1):
        say("line %d/%d sweep=%s job=%s attempt=%s"
            % (number, lines, sweep, job_id, attempt))
        if number < lines and sleep > 0:
            time.sleep(sleep)

    # Simulated failure for retry tests: fail only on the chosen attempt,
    # and leave no result behind.
    if fail_on_attempt is not None and same_attempt(fail_on_attempt, attempt):
        say("echo: failing on purpose (attempt %s)" % attempt)
        return FAIL_EXIT_CODE

    # 3. Result object for gridq.
    result_path = os.environ.get("GRIDQ_RESULT")
    if result_path:
        result = {
            "params": {name: to_json_value(value) for name, value in params.items()},
            "lines": lines,
        }
        if positional:
            result["args"] = positional
        write_result(result_path, result)

    # 4. Exit code (0 unless --exit-code asks for another one).
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
