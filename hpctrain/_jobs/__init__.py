"""Where a wheel installs the job templates and site profiles (package data).

The files live in the checkout's top-level `jobs/` (the source of truth); setup.cfg maps this
package to that directory, so a wheel carries them here. In a checkout this placeholder is all
there is, and `hpctrain.jobs.jobs_dir()` reads `jobs/` directly.
"""
