//! Records the commit the binary is built from (`bench --json`'s `commit`), when git knows it.

fn main() {
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=MOERUNNER_COMMIT={commit}");
    // Rebuilt when HEAD moves (a worktree's .git is a file naming its git dir: then on any change).
    if let Ok(dir) = std::process::Command::new("git")
        .args(["rev-parse", "--git-dir"])
        .output()
    {
        let dir = String::from_utf8_lossy(&dir.stdout).trim().to_string();
        if !dir.is_empty() {
            println!("cargo:rerun-if-changed={dir}/HEAD");
            println!("cargo:rerun-if-changed={dir}/refs");
        }
    }
    println!("cargo:rerun-if-changed=src");
}
