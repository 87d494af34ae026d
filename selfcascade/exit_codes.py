"""How the `selfcascade` commands exit, shared by the command modules (cli, tune_cli,
client_cli): one number for one meaning, whichever command ends with it."""

EXIT_FAILED = 1  # the job failed, or the server refused it
EXIT_USAGE = 2  # bad arguments, values or paths; an install without the command's extra
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
# 128 + SIGPIPE: what a shell reports for a command whose reader went away (`set -o pipefail`).
EXIT_BROKEN_PIPE = 141
