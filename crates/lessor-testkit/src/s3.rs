//! The S3-compatible test server (`scripts/s3-test-server.sh`, which prints `LESSOR_TEST_S3_ENDPOINT`): the endpoint
//! and a bucket on it, or a skip (a failure under CI) when it is not set.
//!
//! moto_server (the default) creates buckets on an unsigned `PUT`. s3s-fs (`LESSOR_S3_SERVER=s3s-fs`) refuses
//! unsigned requests and keeps each bucket as a directory of its root, which the script exports as
//! `LESSOR_TEST_S3_ROOT`: a bucket is then created as that directory.

/// The variable naming the test server's endpoint.
pub const S3_VAR: &str = "LESSOR_TEST_S3_ENDPOINT";
/// The variable naming the root directory of a test server that keeps buckets as directories (s3s-fs).
pub const S3_ROOT_VAR: &str = "LESSOR_TEST_S3_ROOT";

/// The test server's endpoint with `bucket` created on it (an existing bucket is fine), or `None` after
/// [`crate::skip_or_fail`] when the variable is not set.
///
/// # Panics
/// When the server refuses to create the bucket, or under CI when the variable is not set.
pub async fn bucket(bucket: &str) -> Option<String> {
    let Some(endpoint) = std::env::var(S3_VAR).ok().filter(|v| !v.trim().is_empty()) else {
        crate::skip_or_fail(&format!("{S3_VAR} is not set"));
        return None;
    };
    if let Some(root) = std::env::var(S3_ROOT_VAR).ok().filter(|v| !v.trim().is_empty()) {
        std::fs::create_dir_all(std::path::Path::new(&root).join(bucket))
            .expect("create a bucket directory of the S3 test server");
        return Some(endpoint);
    }
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("create a bucket on the S3 test server");
    assert!(
        r.status().is_success() || r.status().as_u16() == 409,
        "create bucket {bucket}: {}",
        r.status()
    );
    Some(endpoint)
}
