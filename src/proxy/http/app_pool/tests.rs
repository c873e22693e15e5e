use std::sync::atomic::{AtomicUsize, Ordering};

use std::convert::Infallible;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;

/// How the test app answers each request it reads.
#[derive(Clone, Copy)]
enum Answer {
    /// `200` with a 2-byte body, connection kept.
    Length,
    /// `200` with a chunked body, connection kept.
    Chunked,
    /// `200` with a 2-byte body, then the app closes the connection.
    Close,
    /// `200` with a body of 1 MiB.
    Large,
    /// `200` with a chunked body and a trailer.
    Trailers,
    /// `413` at once, without reading the request body.
    Early,
    /// Answers a connection's first request (kept); on its second, reads
    /// the head and closes without an answer (an app whose keep-alive
    /// timeout fired just as the request came).
    FirstOnly,
    /// Like `FirstOnly`, but begins an answer to the second request
    /// before closing.
    FirstThenPartial,
}

/// An app on loopback: counts connections, records request heads.
struct App {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

async fn app(answer: Answer) -> App {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let (count, seen) = (accepted.clone(), heads.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut served = 0;
                loop {
                    let mut chunk = [0u8; 4096];
                    let n = match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => n,
                    };
                    buf.extend_from_slice(&chunk[..n]);
                    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        let head: Vec<u8> = buf.drain(..end + 4).collect();
                        seen.lock()
                            .unwrap()
                            .push(String::from_utf8_lossy(&head).into_owned());
                        served += 1;
                        if served > 1 {
                            match answer {
                                Answer::FirstOnly => return,
                                Answer::FirstThenPartial => {
                                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-le").await;
                                    return;
                                }
                                _ => {}
                            }
                        }
                        let reply: Vec<u8> = match answer {
                            Answer::Length => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                            Answer::Chunked => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n".to_vec(),
                            Answer::Close => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec(),
                            Answer::Trailers => b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\nx-t: 1\r\n\r\n".to_vec(),
                            Answer::Early => b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\n\r\n".to_vec(),
                            Answer::FirstOnly | Answer::FirstThenPartial => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                            Answer::Large => {
                                let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n".to_vec();
                                r.resize(r.len() + (1 << 20), b'x');
                                r
                            }
                        };
                        // A HEAD answer has the head only.
                        let reply = if head.starts_with(b"HEAD ") {
                            let end = reply.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
                            reply[..end + 4].to_vec()
                        } else {
                            reply
                        };
                        if s.write_all(&reply).await.is_err() {
                            return;
                        }
                        if let Answer::Close = answer {
                            return;
                        }
                    }
                }
            });
        }
    });
    App {
        addr,
        accepted,
        heads,
    }
}

type TestBody = BoxBody<Bytes, Infallible>;
type TestPool = AppPool<TestBody>;

/// A pool with metrics of its own (not registered anywhere).
fn pool() -> TestPool {
    let counter = |name: &str| IntCounter::new(name, name).unwrap();
    let idle = IntGauge::new("idle", "idle").unwrap();
    let metrics = PoolMetrics {
        opened: counter("opened"),
        idle,
        resent: counter("resent"),
    };
    TestPool::new(Duration::from_secs(5), metrics)
}

fn get(uri: &str) -> Request<TestBody> {
    Request::get(uri)
        .header(hyper::header::HOST, "app.test")
        .body(Empty::new().boxed())
        .unwrap()
}

/// A request body that sends one byte of the length it announces, then
/// nothing (an upload that stalls).
struct Stalled(bool);

impl Body for Stalled {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if std::mem::replace(&mut self.0, true) {
            return Poll::Pending;
        }
        Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"x")))))
    }
}

/// Sends one request and reads the whole body.
async fn exchange(pool: &TestPool, target: SocketAddr, uri: &str) -> Bytes {
    let resp = pool.send(target, get(uri)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    resp.into_body().collect().await.unwrap().to_bytes()
}

#[tokio::test]
async fn requests_read_to_the_end_share_one_connection() {
    for answer in [Answer::Length, Answer::Chunked] {
        let app = app(answer).await;
        let pool = pool();
        for _ in 0..5 {
            assert_eq!(exchange(&pool, app.addr, "/x").await, "ok");
        }
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(app.addr), 1);
        assert_eq!(
            pool.metrics.opened.get(),
            1,
            "the metric counts what the app accepted"
        );
        assert_eq!(pool.metrics.idle.get(), 1);
    }
}

#[tokio::test]
async fn the_app_receives_the_target_in_origin_form() {
    let app = app(Answer::Length).await;
    let pool = pool();
    exchange(&pool, app.addr, "http://app.test/a/b?c=d").await;
    exchange(&pool, app.addr, "http://app.test").await;
    let heads = app.heads.lock().unwrap().clone();
    assert!(
        heads[0].starts_with("GET /a/b?c=d HTTP/1.1\r\n"),
        "{heads:?}"
    );
    assert!(heads[1].starts_with("GET / HTTP/1.1\r\n"), "{heads:?}");
}

#[tokio::test]
async fn a_body_dropped_before_its_end_does_not_return_the_connection() {
    let app = app(Answer::Large).await;
    let pool = pool();
    let resp = pool.send(app.addr, get("/big")).await.unwrap();
    drop(resp);
    assert_eq!(pool.idle_count(app.addr), 0);
    let body = exchange(&pool, app.addr, "/big").await;
    assert_eq!(body.len(), 1 << 20);
    assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    assert_eq!(pool.idle_count(app.addr), 1);
}

/// The app closes each connection after one answer: the pooled connection
/// is found closed and the next request goes out on a new one.
#[tokio::test]
async fn a_connection_the_app_closed_is_not_used_again() {
    let app = app(Answer::Close).await;
    let pool = pool();
    for _ in 0..4 {
        assert_eq!(exchange(&pool, app.addr, "/x").await, "ok");
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn an_unreachable_app_is_an_error() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let pool = pool();
    let err = pool.send(addr, get("/x")).await.err().unwrap();
    assert!(matches!(err, AppError::Connect(_)), "{err:?}");
}

/// Connections idle past the timeout are not handed out again, and the
/// sweeper closes them.
#[tokio::test]
async fn idle_connections_expire() {
    let app = app(Answer::Length).await;
    let pool = pool();
    exchange(&pool, app.addr, "/x").await;
    pool.age(IDLE_TIMEOUT);
    exchange(&pool, app.addr, "/x").await;
    assert_eq!(app.accepted.load(Ordering::SeqCst), 2, "a new connection");
    assert_eq!(pool.idle_count(app.addr), 1);
    let shard = crate::runtime::shard();
    assert!(pool.sweep(shard), "a fresh connection is kept");
    pool.age(IDLE_TIMEOUT);
    assert!(!pool.sweep(shard), "nothing left: the sweeper stops");
    assert_eq!(pool.idle_count(app.addr), 0);
    assert_eq!(pool.metrics.idle.get(), 0);
}

/// Past its limit of idle connections, a finished one is closed instead
/// of kept.
#[tokio::test]
async fn idle_connections_are_bounded() {
    const MAX: usize = 8;
    let app = app(Answer::Length).await;
    let mut pool = pool();
    pool.max_idle = MAX;
    // Responses held open at once need a connection each.
    let mut open = Vec::new();
    for _ in 0..MAX + 3 {
        open.push(pool.send(app.addr, get("/x")).await.unwrap());
    }
    for resp in open {
        resp.into_body().collect().await.unwrap();
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), MAX + 3);
    assert_eq!(pool.idle_count(app.addr), MAX);
    assert_eq!(pool.lock().count, MAX);
    assert_eq!(pool.metrics.idle.get(), MAX as i64);
    assert_eq!(pool.metrics.opened.get(), (MAX + 3) as u64);
    // Taking one makes room for one.
    exchange(&pool, app.addr, "/x").await;
    assert_eq!(pool.lock().count, MAX);
    assert_eq!(app.accepted.load(Ordering::SeqCst), MAX + 3);
}

/// The app answers before it has the request body, which the client never
/// finishes: that connection is still busy and must not serve the next
/// request, which gets a connection of its own at once.
#[tokio::test]
async fn a_connection_still_sending_a_body_is_not_reused() {
    let app = app(Answer::Early).await;
    let pool = pool();
    let upload = Request::post("/upload")
        .header(hyper::header::HOST, "app.test")
        .header(hyper::header::CONTENT_LENGTH, "1000000")
        .body(Stalled(false).boxed())
        .unwrap();
    let resp = pool.send(app.addr, upload).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    resp.into_body().collect().await.unwrap();
    assert_eq!(pool.idle_count(app.addr), 0);
    let next = tokio::time::timeout(Duration::from_secs(5), pool.send(app.addr, get("/x")))
        .await
        .expect("the next request does not wait for the upload")
        .unwrap();
    assert_eq!(next.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
}

/// A chunked body that ends with trailers is over: its connection is
/// reused.
#[tokio::test]
async fn a_body_ending_in_trailers_returns_the_connection() {
    let app = app(Answer::Trailers).await;
    let pool = pool();
    for _ in 0..3 {
        let resp = pool.send(app.addr, get("/x")).await.unwrap();
        let body = resp.into_body().collect().await.unwrap();
        assert_eq!(body.trailers().unwrap()["x-t"], "1");
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
}

/// A `HEAD` answer has a length but no body: the connection is free as
/// soon as the head is in.
#[tokio::test]
async fn a_head_answer_returns_the_connection() {
    let app = app(Answer::Length).await;
    let pool = pool();
    for _ in 0..3 {
        let mut req = get("/x");
        *req.method_mut() = Method::HEAD;
        let resp = pool.send(app.addr, req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .is_empty());
    }
    assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
}

/// An HTTP/1.0 exchange is not kept; CONNECT and HTTP/2 requests are not
/// this pool's to send.
#[tokio::test]
async fn http10_is_not_pooled_and_other_requests_are_refused() {
    let app = app(Answer::Length).await;
    let pool = pool();
    let mut req = get("/x");
    *req.version_mut() = Version::HTTP_10;
    let resp = pool.send(app.addr, req).await.unwrap();
    resp.into_body().collect().await.unwrap();
    assert_eq!(pool.idle_count(app.addr), 0);
    let mut req = get("/x");
    *req.version_mut() = Version::HTTP_2;
    assert!(matches!(
        pool.send(app.addr, req).await,
        Err(AppError::Unsupported)
    ));
    let mut req = get("app.test:443");
    *req.method_mut() = Method::CONNECT;
    assert!(matches!(
        pool.send(app.addr, req).await,
        Err(AppError::Unsupported)
    ));
}

/// Sends `req` on the app's one pooled connection, after it sat idle for
/// `idle`: the app closes it without answering.
async fn on_a_closing_connection(
    idle: Duration,
    req: Request<TestBody>,
) -> (Result<StatusCode, AppError>, usize) {
    closing(Answer::FirstOnly, idle, req).await.0
}

/// `on_a_closing_connection` with another app answer; also the request
/// heads the app saw.
async fn closing(
    answer: Answer,
    idle: Duration,
    req: Request<TestBody>,
) -> ((Result<StatusCode, AppError>, usize), Vec<String>) {
    let app = app(answer).await;
    let pool = pool();
    assert_eq!(exchange(&pool, app.addr, "/first").await, "ok");
    pool.age(idle);
    let status = pool.send(app.addr, req).await.map(|r| r.status());
    let accepted = app.accepted.load(Ordering::SeqCst);
    assert_eq!(pool.metrics.resent.get() as usize, accepted - 1, "resent");
    let heads = app.heads.lock().unwrap().clone();
    ((status, accepted), heads)
}

#[tokio::test]
async fn a_safe_request_an_idle_connection_failed_is_sent_again_on_a_new_one() {
    for method in [Method::GET, Method::HEAD, Method::OPTIONS] {
        let mut req = get("/again");
        *req.method_mut() = method.clone();
        let (status, accepted) = on_a_closing_connection(RESEND_AFTER_IDLE, req).await;
        assert_eq!(status.unwrap(), StatusCode::OK, "{method}");
        assert_eq!(accepted, 2, "{method}: one new connection");
    }
}

#[tokio::test]
async fn requests_that_are_not_safe_to_repeat_are_not_sent_again() {
    let with_body = Request::post("/upload")
        .header(hyper::header::HOST, "app.test")
        .body(http_body_util::Full::new(Bytes::from_static(b"data")).boxed())
        .unwrap();
    let mut delete = get("/thing");
    *delete.method_mut() = Method::DELETE;
    let get_with_body = Request::get("/odd")
        .header(hyper::header::HOST, "app.test")
        .body(http_body_util::Full::new(Bytes::from_static(b"x")).boxed())
        .unwrap();
    for req in [with_body, delete, get_with_body] {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, accepted) = on_a_closing_connection(RESEND_AFTER_IDLE, req).await;
        assert!(
            matches!(status, Err(AppError::Http(_))),
            "{what}: {status:?}"
        );
        assert_eq!(accepted, 1, "{what}: sent again");
    }
}

#[tokio::test]
async fn the_request_sent_again_is_the_same_request() {
    let mut req = get("/same?q=1");
    let xfcc = "By=a;URI=b".parse().unwrap();
    req.headers_mut().insert("x-forwarded-client-cert", xfcc);
    let ((status, _), heads) = closing(Answer::FirstOnly, RESEND_AFTER_IDLE, req).await;
    assert_eq!(status.unwrap(), StatusCode::OK);
    assert_eq!(heads.len(), 3, "{heads:?}");
    assert_eq!(heads[1], heads[2], "the copy differs from the request");
    assert!(
        heads[2].contains("x-forwarded-client-cert: By=a;URI=b"),
        "{heads:?}"
    );
}

#[tokio::test]
async fn an_answer_begun_is_not_asked_for_again() {
    let partial = Answer::FirstThenPartial;
    let ((status, accepted), _) = closing(partial, RESEND_AFTER_IDLE, get("/partial")).await;
    assert!(matches!(status, Err(AppError::Http(_))), "{status:?}");
    assert_eq!(accepted, 1, "sent again after part of an answer");
}

#[tokio::test]
async fn a_connection_in_steady_use_is_not_second_guessed() {
    // Idle for less than the threshold: the failure is the app's answer.
    let (status, accepted) = on_a_closing_connection(Duration::ZERO, get("/busy")).await;
    assert!(matches!(status, Err(AppError::Http(_))), "{status:?}");
    assert_eq!(accepted, 1);
}
