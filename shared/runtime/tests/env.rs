//! The environment fix-ups against the real process environment and clap
//! (one test: it changes this test process's environment).

use devfleet_runtime::settings::{apply_env_fixes, from_env, take_warnings};

#[derive(Debug, clap::Args)]
struct Slots {
    #[arg(long, env = "DEVFLEET_DEV_MAX_SLOTS", default_value_t = 10)]
    max_slots: u32,
}

#[test]
fn empty_values_are_unset_and_deprecated_names_still_work() {
    // Without the fix-ups clap refuses an empty value...
    std::env::set_var("DEVFLEET_DEV_MAX_SLOTS", "");
    assert!(from_env::<Slots>("dev-worker").is_err());
    // ...with them it is unset, so the default applies.
    apply_env_fixes().unwrap();
    assert_eq!(from_env::<Slots>("dev-worker").unwrap().max_slots, 10);
    assert!(take_warnings().is_empty());

    // The old name sets the new one, with a warning naming it.
    std::env::set_var("DEVFLEET_MAX_SLOTS", "4");
    apply_env_fixes().unwrap();
    assert_eq!(from_env::<Slots>("dev-worker").unwrap().max_slots, 4);
    let warnings = take_warnings();
    assert!(
        warnings.len() == 1 && warnings[0].contains("DEVFLEET_DEV_MAX_SLOTS"),
        "{warnings:?}"
    );
}
