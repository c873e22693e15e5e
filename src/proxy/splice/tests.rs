use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Two connected sockets: (one end, the other end).
async fn socket_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap());
    let (client, accepted) = tokio::join!(client, listener.accept());
    (client.unwrap(), accepted.unwrap().0)
}

/// client ⇄ [accepted | splice | upstream] ⇄ server, all real sockets.
async fn spliced(
    idle: Duration,
) -> (
    TcpStream,
    TcpStream,
    tokio::task::JoinHandle<(io::Result<(u64, u64)>, u64, u64)>,
) {
    let (client, accepted) = socket_pair().await;
    let (upstream, server) = socket_pair().await;
    let task = tokio::spawn(async move {
        let traffic = Traffic::uncounted();
        let r = splice(accepted, upstream, idle, &traffic).await;
        (r, traffic.received.get(), traffic.sent.get())
    });
    (client, server, task)
}

#[tokio::test]
async fn bytes_and_half_closes_pass_both_ways_and_are_counted() {
    let (mut client, mut server, task) = spliced(Duration::from_secs(10)).await;
    // More than the largest read, so the buffer grows on the way.
    let upload: Vec<u8> = (0..3 * MAX_BUFFER + 123).map(|i| (i % 251) as u8).collect();
    client.write_all(&upload).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert!(got == upload, "the upload arrived changed or cut");
    // The client half-closed; the way back still works.
    server
        .write_all(b"answer after the half-close")
        .await
        .unwrap();
    drop(server);
    let mut back = Vec::new();
    client.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"answer after the half-close");
    let (result, received, sent) = task.await.unwrap();
    let expected = (upload.len() as u64, 27);
    assert_eq!(result.unwrap(), expected);
    assert_eq!((received, sent), expected);
}

#[tokio::test]
async fn a_connection_with_no_bytes_either_way_ends_after_the_idle_time() {
    let (_client, _server, task) = spliced(Duration::from_millis(200)).await;
    let (result, _, _) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the idle connection was never closed")
        .unwrap();
    assert_eq!(result.unwrap_err().kind(), io::ErrorKind::TimedOut);
}

#[tokio::test]
async fn a_reset_on_one_side_ends_both() {
    let (client, mut server, task) = spliced(Duration::from_secs(10)).await;
    // An abortive close: the next read on the accepted side fails.
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(client);
    let (result, _, _) = task.await.unwrap();
    assert!(result.is_err(), "a reset was taken for an orderly end");
    let mut rest = Vec::new();
    let _ = server.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
}
