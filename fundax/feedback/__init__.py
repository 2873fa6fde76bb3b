"""Human (and simulated) feedback on generated candidates: the rating store, app and exports.

Modules: store (database schema, migrations, idempotent writes), importer (run manifests ->
candidates), app and pages (the web app, which needs the `web` extra), agreement (inter-rater
statistics), simulate (simulated raters from phantom truth), export (the Selector training set,
JSONL).

What the `fundax feedback ...` subcommands call (each takes a SQLite path or SQLAlchemy URL):
    import RUN_DIR    importer.import_run(run_dir, db, media=None) -> new candidates
    add-rater         app.create_rater(db, name, is_admin=False, weight=1.0) -> token
    serve             app.serve(db, host="127.0.0.1", port=8000)
    simulate          simulate.simulate(db, seed=0) -> {"ratings": n, "pairs": n}
    export            export.export_jsonl(db, out, include_simulated=True) -> lines written
    demo run          importer.write_phantom_run(run_dir, num_prompts=4, per_prompt=4)
"""
