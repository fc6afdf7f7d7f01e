"""The Flex Template launcher's program: ``headrace run $HEADRACE_TEMPLATE_PIPELINE`` on Dataflow.

Google's launcher runs this file with the template's parameters as ``--name=value`` arguments;
`headrace.runners.templates.template_argv` maps them to the CLI's flags (see that module)."""

import os
import sys

from headrace.runners import cli, templates

if __name__ == "__main__":
    pipeline = os.environ["HEADRACE_TEMPLATE_PIPELINE"]
    sys.exit(cli.main(templates.template_argv(pipeline, sys.argv[1:])))
