//! A long-lived boto3 S3 client in its own Python process, holding one set of credentials in
//! memory the way an application's SDK client caches them: the tests send it object keys and
//! read back what each PUT answered, to prove that revocation reaches clients that never read
//! the files again.

use std::process::Stdio;

use anyhow::Context;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use keybroker_contract::wire::Credentials;

const SCRIPT: &str = r#"
import sys, boto3, botocore.config, botocore.exceptions
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
    config=botocore.config.Config(retries={"max_attempts": 1}, s3={"addressing_style": "path"}))
print("ready", flush=True)
for line in sys.stdin:
    bucket, key = line.strip().split("/", 1)
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=b"keybroker e2e")
        print("OK", flush=True)
    except botocore.exceptions.ClientError as e:
        print(e.response.get("Error", {}).get("Code", "Unknown"), flush=True)
    except Exception as e:
        print("Error:" + type(e).__name__, flush=True)
"#;

/// One boto3 client with fixed credentials.
#[derive(Debug)]
pub struct CachedClient {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl CachedClient {
    /// Starts the client for S3 at `endpoint` with `creds` (given through the environment,
    /// as an SDK that loaded them once holds them).
    pub async fn start(endpoint: &str, creds: &Credentials) -> anyhow::Result<Self> {
        let python = tokio::task::spawn_blocking(crate::sidecar::python_with_boto3).await??;
        let mut child = Command::new(python)
            .args(["-c", SCRIPT, endpoint])
            .env_clear()
            .env("AWS_ACCESS_KEY_ID", &creds.access_key_id)
            .env("AWS_SECRET_ACCESS_KEY", &creds.secret_access_key)
            .env("AWS_SESSION_TOKEN", &creds.session_token)
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("NO_PROXY", "127.0.0.1,localhost")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting boto3")?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?).lines();
        let mut client = Self {
            child,
            stdin,
            stdout,
        };
        let ready = client.answer().await?;
        anyhow::ensure!(ready == "ready", "boto3 said {ready:?}");
        Ok(client)
    }

    /// PUTs `bucket/key` with the cached credentials: `"OK"` or the S3 error code.
    pub async fn put(&mut self, bucket: &str, key: &str) -> anyhow::Result<String> {
        self.stdin
            .write_all(format!("{bucket}/{key}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        self.answer().await
    }

    async fn answer(&mut self) -> anyhow::Result<String> {
        let line =
            tokio::time::timeout(std::time::Duration::from_secs(30), self.stdout.next_line())
                .await
                .context("boto3 did not answer within 30 s")??;
        line.context("boto3 exited")
    }
}

impl Drop for CachedClient {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
