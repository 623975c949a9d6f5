"""Task-side pieces shared by methods and baselines: templates and verbalizers."""
