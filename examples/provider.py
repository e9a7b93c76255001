"""A small OAuth 2.0 authorization server on oauthmig's models (stdlib ``wsgiref`` only).

It uses only the public API (``oauthmig.models``, ``oauthmig.errors``, ``oauthmig.config``)
the way README "Adopting the models" shows it:

    GET  /.well-known/oauth-authorization-server   RFC 8414 metadata
    GET  /authorize     authorization code (RFC 6749 §4.1) with PKCE (RFC 7636); the user is
                        USER_ID and consent is implied: put your login and consent page here
    POST /token         authorization_code and refresh_token grants; client authentication by
                        client_secret_basic, client_secret_post or none (RFC 6749 §2.3.1)
    GET  /userinfo      a resource: the bearer token's user, honouring revocation

Run it against a migrated database (``oauthmig upgrade``; revision 0007 for observe mode):

    python examples/provider.py --config oauthmig.toml --port 8000

Error responses are the RFC 6749 §5.2 JSON body (401 with ``WWW-Authenticate`` for a failed
client authentication); token responses carry ``Cache-Control: no-store`` (RFC 6749 §5.1).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs, urlencode

from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from oauthmig.config import ClientMetadataDefaults, load_settings
from oauthmig.errors import InvalidClient, InvalidRequest, OAuthError
from oauthmig.models import (
    DEFAULT_MODELS,
    DEFAULT_POLICY,
    ApplicationModel,
    EnforcementPolicy,
    OAuthModels,
    authenticate_client,
    authorization_server_metadata,
    build_models,
    exchange_code,
    find_active_token,
    new_grant,
    parse_basic_credentials,
    rotate_refresh_token,
)

USER_ID = 1
StartResponse = Callable[[str, list[tuple[str, str]]], Any]
_STATUS = {200: "200 OK", 302: "302 Found", 400: "400 Bad Request", 401: "401 Unauthorized"}
_NO_STORE = [("Cache-Control", "no-store"), ("Pragma", "no-cache")]


class Response:
    """Status, headers and a JSON body."""

    def __init__(
        self,
        status: int,
        body: dict[str, Any] | None = None,
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        self.status, self.body, self.headers = status, body, list(headers)


def _error(exc: OAuthError, *, basic: bool = False) -> Response:
    headers = list(_NO_STORE)
    if isinstance(exc, InvalidClient) and basic:
        # RFC 6749 §5.2: answer the scheme the client authenticated with.
        headers.append(("WWW-Authenticate", 'Basic realm="token"'))
    return Response(exc.status, exc.response(), headers)


def _single(params: dict[str, list[str]]) -> dict[str, str]:
    """Request parameters; RFC 6749 §3.1 and §3.2: none may be repeated."""
    for name, values in params.items():
        if len(values) > 1:
            raise InvalidRequest(f"parameter {name} is repeated")
    return {name: values[0] for name, values in params.items()}


class ExampleProvider:
    """The WSGI application. ``sessions`` makes a new ORM session per request."""

    def __init__(
        self,
        sessions: Callable[[], Session],
        *,
        models: OAuthModels = DEFAULT_MODELS,
        policy: EnforcementPolicy = DEFAULT_POLICY,
        client_metadata: ClientMetadataDefaults | None = None,
        grace_seconds: float = 0,
        issuer: str | None = None,
    ) -> None:
        self.sessions = sessions
        self.models = models
        self.policy = policy
        self.client_metadata = client_metadata
        self.grace_seconds = grace_seconds
        self.issuer = issuer

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path, method = environ.get("PATH_INFO", "/"), environ.get("REQUEST_METHOD", "GET")
        routes = {
            ("GET", "/.well-known/oauth-authorization-server"): self.metadata,
            ("GET", "/authorize"): self.authorize,
            ("POST", "/token"): self.token,
            ("GET", "/userinfo"): self.userinfo,
        }
        handler = routes.get((method, path))
        if handler is None:
            response = Response(
                400, {"error": "invalid_request", "error_description": "no such endpoint"}
            )
        else:
            response = handler(environ)
        headers = list(response.headers)
        payload = b""
        if response.body is not None:
            payload = json.dumps(response.body).encode()
            headers.append(("Content-Type", "application/json"))
        headers.append(("Content-Length", str(len(payload))))
        start_response(_STATUS[response.status], headers)
        return [payload]

    def _issuer(self, environ: dict[str, Any]) -> str:
        if self.issuer is not None:
            return self.issuer
        return f"{environ.get('wsgi.url_scheme', 'http')}://{environ['HTTP_HOST']}"

    def metadata(self, environ: dict[str, Any]) -> Response:
        issuer = self._issuer(environ)
        body = authorization_server_metadata(
            issuer,
            authorization_endpoint=f"{issuer}/authorize",
            token_endpoint=f"{issuer}/token",
            client_metadata=self.client_metadata,
            policy=self.policy,
            extra={"userinfo_endpoint": f"{issuer}/userinfo"},
        )
        return Response(200, body)

    def authorize(self, environ: dict[str, Any]) -> Response:
        try:
            params = _single(parse_qs(environ.get("QUERY_STRING", "")))
        except InvalidRequest as exc:
            return _error(exc)
        A = self.models.Application
        with self.sessions() as session:
            client = session.scalars(
                select(A).where(A.client_id == params.get("client_id", ""))
            ).one_or_none()
            redirect_uri = params.get("redirect_uri", "")
            # RFC 6749 §4.1.2.1: never redirect to an unverified URI; answer the user instead.
            if client is None or redirect_uri not in client.redirect_uri_list:
                return _error(InvalidRequest("unknown client_id or unregistered redirect_uri"))
            state = {"state": params["state"]} if "state" in params else {}
            try:
                grant = new_grant(
                    session,
                    application=client,
                    user_id=USER_ID,
                    redirect_uri=redirect_uri,
                    scopes=params.get("scope", "").split(),
                    code_challenge=params.get("code_challenge"),
                    code_challenge_method=params.get("code_challenge_method"),
                    response_type=params.get("response_type", ""),
                    policy=self.policy,
                    models=self.models,
                )
            except OAuthError as exc:
                query = urlencode({**exc.response(), **state})
                return Response(302, None, [("Location", f"{redirect_uri}?{query}")])
            query = urlencode({"code": grant.code, **state})
            return Response(302, None, [("Location", f"{redirect_uri}?{query}")])

    def _client(
        self, session: Session, environ: dict[str, Any], form: dict[str, str]
    ) -> ApplicationModel:
        """RFC 6749 §2.3.1: the Authorization header, or the form, or a client_id alone."""
        basic = parse_basic_credentials(environ.get("HTTP_AUTHORIZATION"))
        if basic is not None:
            if "client_secret" in form:
                raise InvalidRequest("use one client authentication method, not two")
            client_id, secret = basic
            if form.get("client_id", client_id) != client_id:
                raise InvalidRequest("client_id does not match the Authorization header")
            return authenticate_client(
                session,
                client_id=client_id,
                client_secret=secret,
                method="client_secret_basic",
                policy=self.policy,
                models=self.models,
            )
        method = "client_secret_post" if "client_secret" in form else "none"
        return authenticate_client(
            session,
            client_id=form.get("client_id", ""),
            client_secret=form.get("client_secret"),
            method=method,
            policy=self.policy,
            models=self.models,
        )

    def token(self, environ: dict[str, Any]) -> Response:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length).decode("utf-8", "replace")
        basic = bool(environ.get("HTTP_AUTHORIZATION"))
        with self.sessions() as session:
            try:
                form = _single(parse_qs(raw))
                client = self._client(session, environ, form)
                grant_type = form.get("grant_type")
                if grant_type == "authorization_code":
                    issued = exchange_code(
                        session,
                        application=client,
                        code=form.get("code", ""),
                        redirect_uri=form.get("redirect_uri"),
                        code_verifier=form.get("code_verifier"),
                        policy=self.policy,
                        models=self.models,
                    )
                elif grant_type == "refresh_token":
                    issued = rotate_refresh_token(
                        session,
                        form.get("refresh_token", ""),
                        application=client,
                        grace_seconds=self.grace_seconds,
                        policy=self.policy,
                        models=self.models,
                    )
                else:
                    session.rollback()
                    return Response(
                        400,
                        {
                            "error": "unsupported_grant_type",
                            "error_description": "use authorization_code or refresh_token",
                        },
                        _NO_STORE,
                    )
            except OAuthError as exc:
                session.rollback()
                return _error(exc, basic=basic)
            return Response(200, dict(issued.response()), _NO_STORE)

    def userinfo(self, environ: dict[str, Any]) -> Response:
        scheme, _, bearer = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
        with self.sessions() as session:
            token = (
                find_active_token(session, bearer.strip(), models=self.models)
                if scheme.lower() == "bearer"
                else None
            )
            if token is None:
                return Response(
                    401,
                    {"error": "invalid_token"},
                    [("WWW-Authenticate", 'Bearer error="invalid_token"')],
                )
            return Response(200, {"sub": str(token.user_id)})


def main() -> None:
    """Serve the example on 127.0.0.1 with the configuration's first application database."""
    from wsgiref.simple_server import make_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    settings = load_settings(args.config)
    database = settings.databases[settings.routing["application"][0]]
    engine = create_engine(database.url or "")
    models = build_models(settings.tables, defaults=settings.models.defaults, engine=engine)
    app = ExampleProvider(
        lambda: Session(engine),
        models=models,
        policy=EnforcementPolicy.from_settings(settings.enforcement),
        client_metadata=settings.backfill.client_metadata,
    )
    with make_server("127.0.0.1", args.port, app) as server:
        print(f"serving on http://127.0.0.1:{server.server_port}")
        server.serve_forever()


if __name__ == "__main__":
    main()
