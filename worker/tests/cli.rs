//! The binary's command line: help, exit codes and messages for bad configuration.

use std::process::Command;

fn worker() -> Command {
    Command::new(env!("CARGO_BIN_EXE_opsgenie-worker"))
}

#[test]
fn help_names_every_command_and_the_env_of_each_flag() {
    let out = worker().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for command in ["run", "enqueue", "dead", "check"] {
        assert!(
            text.contains(command),
            "{command} missing from --help:\n{text}"
        );
    }
    let out = worker().args(["run", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "AMQP_URL",
        "REDIS_URL",
        "OPSGENIE_KEYRING",
        "WORKER_PREFETCH",
        "METRICS_ADDR",
        "LOG_FORMAT",
        "[default: 64]",
        "[default: opsgenie]",
        "[default: opsgenie.alerts]",
    ] {
        assert!(
            text.contains(needle),
            "{needle} missing from run --help:\n{text}"
        );
    }
    assert!(
        !text.contains("guest:guest"),
        "run --help shows the broker password"
    );
}

#[test]
fn a_missing_keyring_exits_2_and_names_the_file() {
    let out = worker()
        .args([
            "run",
            "--keyring",
            "/nonexistent/keyring.toml",
            "--metrics-addr",
            "off",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/keyring.toml"), "{err}");
}

#[test]
fn a_name_the_broker_cannot_take_exits_2_before_anything_panics() {
    let long = "q".repeat(300);
    let out = worker()
        .args([
            "run",
            "--keyring",
            "../keyring.toml",
            "--metrics-addr",
            "off",
            "--queue",
            &long,
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("255"), "{err}");
}

#[test]
fn a_bad_flag_value_exits_2_with_what_to_fix() {
    for (args, needle) in [
        (vec!["run", "--prefetch", "0"], "--prefetch"),
        (vec!["run", "--metrics-addr", "nowhere"], "is not host:port"),
        (vec!["run", "--retry-delays", "2m,1s"], "shortest first"),
        (vec!["run", "--max-age", "soon"], "is not a duration"),
    ] {
        let out = worker().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

#[test]
fn a_keyring_error_names_line_and_field_and_hides_the_key() {
    let dir = std::env::temp_dir().join(format!("cli-keyring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("keyring.toml");
    std::fs::write(
        &path,
        "[[team]]\nid = \"ops\"\nintegration_key = \"s3cr3t-key\"\nregion = \"mars\"\n",
    )
    .unwrap();
    let out = worker()
        .args(["check", "--keyring"])
        .arg(&path)
        .output()
        .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.contains("keyring.toml:2"), "{all}");
    assert!(all.contains("region"), "{all}");
    assert!(!all.contains("s3cr3t-key"), "{all}");
}
