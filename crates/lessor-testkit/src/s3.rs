//! The S3-compatible test server (`scripts/s3-test-server.sh`, which prints `LESSOR_TEST_S3_ENDPOINT`): the endpoint
//! and a bucket on it, or a skip (a failure under CI) when it is not set.

/// The variable naming the test server's endpoint.
pub const S3_VAR: &str = "LESSOR_TEST_S3_ENDPOINT";

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
