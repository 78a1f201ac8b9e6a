"""The `engramlab continual` command group (papers 4 and 5); the methods live in `engramlab.hlop` and
`engramlab.tta`."""
