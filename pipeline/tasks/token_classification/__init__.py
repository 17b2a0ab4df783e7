"""Token classification (NER): the task, tag schemes, checks and reports."""
