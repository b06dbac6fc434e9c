"""The study on top of the harness: the `demo` driver, the findings' rules, their ground-truth controls, and the
report that puts every number in one file. Built on everything below it; nothing below imports it."""
