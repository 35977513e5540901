//! The hostile load of the attack tests, for the webhook and broker tables "under attack":
//! the same generators (`keybroker_e2e::attack`), each worker from its own source address as
//! pods on a network are, running until the returned [`Attack`] is dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use keybroker_e2e::attack;
use keybroker_e2e::https::Client;

/// Running attackers; dropping it stops them and closes their connections.
pub(crate) struct Attack {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    _idle: Vec<tokio::net::TcpStream>,
    pub(crate) what: String,
}

impl Drop for Attack {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn peer(n: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 10 + (n % 200) as u8])
}

/// At the webhook: 3 workers sending 50,000-name reviews, 4 sending 3 MiB of nonsense, and
/// 1,000 connections that never speak.
pub(crate) async fn on_webhook(addr: SocketAddr, client: &Client) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let huge = Arc::new(attack::many_names_review("huge", "bench", 50_000));
    let (_, mut tasks) = attack::flood(3, Arc::clone(&stop), {
        let (client, huge) = (client.clone(), Arc::clone(&huge));
        move |worker, _| {
            let (client, huge) = (client.from_source(peer(worker)), Arc::clone(&huge));
            async move {
                client
                    .send("POST", "/mutate", None, huge.to_vec())
                    .await
                    .is_ok()
            }
        }
    });
    let nonsense: Arc<Vec<Vec<u8>>> =
        Arc::new((0..4).map(|i| attack::nonsense_body(i, 3 << 20)).collect());
    let (_, more) = attack::flood(4, Arc::clone(&stop), {
        let (client, nonsense) = (client.clone(), Arc::clone(&nonsense));
        move |worker, _| {
            let (client, nonsense) = (client.from_source(peer(10 + worker)), Arc::clone(&nonsense));
            async move {
                client
                    .send("POST", "/mutate", None, nonsense[worker].clone())
                    .await
                    .is_ok()
            }
        }
    });
    tasks.extend(more);
    let idle = attack::idle_connections(addr, 1000).await;
    Attack {
        what: format!(
            "3 x 50,000-name reviews, 4 x 3 MiB nonsense, {} idle connections",
            idle.len()
        ),
        stop,
        tasks,
        _idle: idle,
    }
}

/// At the broker: 16 workers sending distinct junk bearer tokens, 50 connections holding
/// revocation long-polls for `token`'s pod (5,000 in all, past every cap), and 1,000 idle
/// connections.
pub(crate) async fn on_broker(addr: SocketAddr, client: &Client, token: &str) -> Attack {
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let body = serde_json::to_vec(&serde_json::json!({"apiKey": "uploader"})).unwrap_or_default();
    let (_, mut tasks) = attack::flood(16, Arc::clone(&stop), {
        let (client, next) = (client.clone(), Arc::clone(&next));
        move |worker, _| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let (client, body) = (client.from_source(peer(worker)), body.clone());
            async move {
                client
                    .send("POST", "/v1/exchange", Some(&attack::junk_token(i)), body)
                    .await
                    .is_ok()
            }
        }
    });
    let polls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (_, more) = attack::flood(50, Arc::clone(&stop), {
        let (client, token, polls) = (client.clone(), token.to_owned(), Arc::clone(&polls));
        move |worker, _| {
            let (client, token, polls) = (
                client.from_source(peer(20 + worker)),
                token.clone(),
                Arc::clone(&polls),
            );
            async move {
                if polls.fetch_add(1, Ordering::Relaxed) >= 5000 {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    return true;
                }
                client
                    .send(
                        "GET",
                        "/v1/revocations?apiKey=uploader&waitSeconds=20",
                        Some(&token),
                        Vec::new(),
                    )
                    .await
                    .is_ok()
            }
        }
    });
    tasks.extend(more);
    let idle = attack::idle_connections(addr, 1000).await;
    Attack {
        what: format!(
            "16 x distinct junk tokens, 5,000 long-polls from one pod, {} idle connections",
            idle.len()
        ),
        stop,
        tasks,
        _idle: idle,
    }
}
