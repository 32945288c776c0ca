"""What a user runs: the `agegender` command, predict and the web page. Nothing imports an app."""
